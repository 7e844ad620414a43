-- Argo CD health of a fermata.dev TrainingRun (argocd-cm: resource.customizations.health.fermata.dev_TrainingRun).
--   Progressing: no status yet, the operator has not acted on the latest spec (observedGeneration <
--                metadata.generation), Pending (waiting for a node), Preparing (the dataset, on CPU), or a suspend/resume in flight
--   Healthy:     Running (and no NO-GO recorded), or Succeeded with GO / CONDITIONAL-GO
--   Suspended:   Suspended with spec.suspend true
--   Degraded:    spec not accepted, a NO-GO decision, Failed, BudgetExceeded, IdleStopped, Stopped
-- Runs in Argo CD's Lua 5.1 sandbox: no libraries beyond string/table/math are used.
local hs = {}

local function num(x, fmt)
  if type(x) ~= "number" then
    return "?"
  end
  return string.format(fmt or "%.2f", x)
end

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function summary(status)
  local parts = {}
  if type(status.progressPercent) == "number" then
    table.insert(parts, num(status.progressPercent, "%.1f") .. "% done")
  end
  if status.cost ~= nil and type(status.cost.accruedUSD) == "number" then
    table.insert(parts, "$" .. num(status.cost.accruedUSD) .. " of $" .. num(status.cost.budgetUSD))
  end
  if status.decision ~= nil then
    table.insert(parts, "decision " .. status.decision)
  end
  if #parts == 0 then
    return ""
  end
  return " (" .. table.concat(parts, ", ") .. ")"
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Fermata operator to pick up the run"
  return hs
end

local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. num(generation, "%d")
    .. " (observed " .. num(status.observedGeneration, "%d") .. ")"
  return hs
end

local accepted = condition(status, "Accepted")
if accepted ~= nil and accepted.status == "False" then
  hs.status = "Degraded"
  hs.message = "Spec not accepted: " .. (accepted.message or accepted.reason or "")
  return hs
end

local phase = status.phase
local suspend = obj.spec ~= nil and obj.spec.suspend == true
local message = status.message or ""
local details = summary(status)

if phase == "Pending" or phase == "Preparing" then
  hs.status = "Progressing"
  hs.message = phase .. ": " .. message .. details
elseif phase == "Running" then
  if status.decision == "NO-GO" then
    hs.status = "Degraded"
    hs.message = "Running after a NO-GO: " .. (status.decisionReason or message) .. details
  elseif suspend then
    hs.status = "Progressing"
    hs.message = "Suspending: checkpointing before the GPU is released" .. details
  else
    hs.status = "Healthy"
    hs.message = "Running" .. details
  end
elseif phase == "Suspended" then
  if suspend then
    hs.status = "Suspended"
    hs.message = "Suspended: set spec.suspend=false to resume" .. details
  else
    hs.status = "Progressing"
    hs.message = "Resuming from the last checkpoint" .. details
  end
elseif phase == "Succeeded" then
  if status.decision == "NO-GO" then
    hs.status = "Degraded"
    hs.message = "Succeeded with NO-GO: " .. (status.decisionReason or message) .. details
  else
    hs.status = "Healthy"
    hs.message = "Succeeded" .. details
  end
elseif phase == "Failed" or phase == "BudgetExceeded" or phase == "IdleStopped" or phase == "Stopped" then
  hs.status = "Degraded"
  hs.message = phase .. ": " .. message .. details
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
