-- Resume: a new pod continues from the last verified checkpoint.
obj.spec.suspend = false
return obj
