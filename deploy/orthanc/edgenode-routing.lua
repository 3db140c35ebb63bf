-- Orthanc routing for edgenode: send original chest CT / CR / DX series to the node once the study
-- is stable, never the node's own results (SEG, SR, secondary captures, Manufacturer "edgenode").
--
-- Copy this file next to orthanc.json, list it under "LuaScripts", and declare the node under
-- "DicomModalities" as "edgenode" (see orthanc.json in this folder).
--
-- Several nodes (operator guide, "More than one node"): declare each as "edgenode-<name>" instead
-- ("edgenode-a", "edgenode-b", ...). Each study goes whole to one of them, always the same one for a
-- study (chosen from Orthanc's study ID, a hash of the study's UIDs), so a study that grows later goes
-- where the rest of it is. With "EdgenodeFailover": true in orthanc.json (only where the nodes share
-- their spool), a study the chosen node does not take goes to the next node at once instead of waiting
-- for a retry.
--
-- A forward the node refuses or cannot take (node down, low disk, restarting) is retried: after
-- RETRY_FIRST_SECONDS, doubling up to RETRY_MAX_SECONDS, for RETRY_FOR_SECONDS, then given up (logged;
-- resend by hand as the operator guide says). Retries run on Orthanc's Lua heartbeat (Orthanc >= 1.11:
-- set "LuaHeartBeatPeriod", e.g. 30) and, on any version, whenever an instance arrives. The retry list
-- lives in memory: after an Orthanc restart, resend what was pending by hand.

local NODE = 'edgenode'                              -- the node in DicomModalities, or the prefix of several
local ROUTED_MODALITIES = { CT = true, CR = true, DX = true }
local RETRY_FIRST_SECONDS = 30
local RETRY_MAX_SECONDS = 600
local RETRY_FOR_SECONDS = 24 * 3600
local routed = {}                                    -- series already sent (since Orthanc started)
local retries = {}                                   -- study ID -> { resources, delay, next_at, since }

-- The nodes declared in DicomModalities ("edgenode", or "edgenode-*"), sorted by name.
local function Nodes()
  local nodes = {}
  for _, name in ipairs(ParseJson(RestApiGet('/modalities'))) do
    if name == NODE or string.sub(name, 1, string.len(NODE) + 1) == NODE .. '-' then
      table.insert(nodes, name)
    end
  end
  table.sort(nodes)
  return nodes
end

-- The nodes to try for a study: its own node first (the same one every time), then, with failover, the others.
local function NodesFor(studyId)
  local nodes = Nodes()
  if #nodes == 0 then
    print('edgenode routing: no node in DicomModalities (declare "' .. NODE .. '" or "' .. NODE .. '-<name>")')
    return nodes
  end
  local first = tonumber(string.sub(studyId, 1, 8), 16) % #nodes
  local config = GetOrthancConfiguration()
  local count = (config['EdgenodeFailover'] == true) and #nodes or 1
  local order = {}
  for k = 0, count - 1 do
    table.insert(order, nodes[(first + k) % #nodes + 1])
  end
  return order
end

-- One association for the whole study; the node treats a repeated instance as a no-op, so a resend
-- (a retry, or after an Orthanc restart) is harmless. True when a node took every instance.
local function Forward(studyId, resources)
  local body = DumpJson({ Resources = resources, Synchronous = true })
  for _, node in ipairs(NodesFor(studyId)) do
    local ok, answer = pcall(RestApiPost, '/modalities/' .. node .. '/store', body, false)
    if ok and answer ~= nil then
      for _, id in ipairs(resources) do
        routed[id] = true
      end
      retries[studyId] = nil
      print('edgenode routing: sent ' .. #resources .. ' series of study ' .. studyId .. ' to ' .. node)
      return true
    end
    print('edgenode routing: ' .. node .. ' did not take study ' .. studyId)
  end
  return false
end

local function ScheduleRetry(studyId, resources)
  local now = os.time()
  local entry = retries[studyId]
  if entry == nil then
    entry = { delay = RETRY_FIRST_SECONDS, since = now }
  else
    entry.delay = math.min(entry.delay * 2, RETRY_MAX_SECONDS)
  end
  entry.resources = resources
  entry.next_at = now + entry.delay
  if now - entry.since >= RETRY_FOR_SECONDS then
    retries[studyId] = nil
    print('edgenode routing: GAVE UP forwarding study ' .. studyId .. ' after ' .. RETRY_FOR_SECONDS ..
      ' s of refusals; resend it by hand')
    return
  end
  retries[studyId] = entry
  print('edgenode routing: the node did not take study ' .. studyId .. '; retrying in ' .. entry.delay .. ' s')
end

local function RetryDue()
  local now = os.time()
  local due = {}
  for studyId, entry in pairs(retries) do
    if entry.next_at <= now then
      table.insert(due, studyId)
    end
  end
  for _, studyId in ipairs(due) do
    local resources = retries[studyId].resources
    if not Forward(studyId, resources) then
      ScheduleRetry(studyId, resources)
    end
  end
end

function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local resources = {}
  for _, s in ipairs(series) do
    local t = s['MainDicomTags']
    local modality = t['Modality'] or ''
    local manufacturer = t['Manufacturer'] or ''
    if ROUTED_MODALITIES[modality] and manufacturer ~= 'edgenode' and not routed[s['ID']] then
      table.insert(resources, s['ID'])
    end
  end
  if #resources > 0 then
    print('edgenode routing: sending ' .. #resources .. ' series of study ' .. studyId)
    if not Forward(studyId, resources) then
      ScheduleRetry(studyId, resources)
    end
  end
  RetryDue()
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  RetryDue()
end

function OnHeartBeat()
  RetryDue()
end
