-- Which TrainingRun actions Argo CD offers (argocd-cm: resource.customizations.actions.fermata.dev_TrainingRun).
local actions = {}
local phase = obj.status ~= nil and obj.status.phase or nil
local finished = phase == "Succeeded" or phase == "Failed" or phase == "BudgetExceeded"
  or phase == "IdleStopped" or phase == "Stopped"
local suspended = obj.spec.suspend == true

actions["suspend"] = {["disabled"] = finished or suspended}
actions["resume"] = {["disabled"] = finished or not suspended}
-- Raise spec.budget.maxUSD by amountUSD (Argo CD >= 2.13 asks for it; older ones use the default).
actions["raise-budget"] = {
  ["disabled"] = finished,
  ["params"] = {
    {["name"] = "amountUSD", ["default"] = "100"}
  }
}
return actions
