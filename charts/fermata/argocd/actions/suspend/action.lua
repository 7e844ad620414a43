-- Suspend: the operator asks the trainer for a checkpoint, stops the pod and releases the GPU.
obj.spec.suspend = true
return obj
