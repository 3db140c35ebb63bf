-- Orthanc routing for edgenode: send original chest CT / CR / DX series to the node once the study
-- is stable, never the node's own results (SEG, SR, secondary captures, Manufacturer "edgenode").
--
-- Copy this file next to orthanc.json, list it under "LuaScripts", and declare the node under
-- "DicomModalities" as "edgenode" (see orthanc.json in this folder).

local NODE = 'edgenode'                              -- name of the node in DicomModalities
local ROUTED_MODALITIES = { CT = true, CR = true, DX = true }
local routed = {}                                    -- series already sent (since Orthanc started)

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
    -- One association for the whole study; the node treats a repeated instance as a no-op,
    -- so a resend after an Orthanc restart is harmless.
    RestApiPost('/modalities/' .. NODE .. '/store', DumpJson({ Resources = resources, Synchronous = true }), false)
    for _, id in ipairs(resources) do
      routed[id] = true
    end
  end
end
