-- Raise spec.budget.maxUSD by the amountUSD parameter (default and fixed step without parameters:
-- 100 US dollars). The CRD caps maxUSD at 10,000,000.
local step = 100
if actionParams ~= nil and actionParams["amountUSD"] ~= nil and actionParams["amountUSD"] ~= "" then
  step = tonumber(actionParams["amountUSD"])
  if step == nil or step <= 0 then
    error("amountUSD must be a positive number of US dollars, got: " .. tostring(actionParams["amountUSD"]), 0)
  end
end
local current = obj.spec.budget.maxUSD
if type(current) ~= "number" then
  error("spec.budget.maxUSD is not set", 0)
end
local raised = math.floor((current + step) * 100 + 0.5) / 100
if raised > 10000000 then
  error("spec.budget.maxUSD cannot exceed 10000000", 0)
end
obj.spec.budget.maxUSD = raised
return obj
