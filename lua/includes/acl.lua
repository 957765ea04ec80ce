--[[
  includes/acl.lua: refuse, before the first write, a call whose ACL user may not run every command
  the script may run. Redis checks permissions command by command inside a script, so a denied
  command midway would fail the call after some of its writes; this checks them all up front
  (redis.acl_check_cmd, Redis >= 7.0).
]]
local function check_commands(commands, channel)
  if not redis.acl_check_cmd then return nil end  -- an emulator without ACLs (fakeredis)
  for _, command in ipairs(commands) do
    if not redis.acl_check_cmd(command) then
      return 'VRC_NOPERM the Redis user may not run ' .. string.upper(command)
          .. ', which the cache needs: grant the ACL rule set in the README section Security'
    end
  end
  if channel and not redis.acl_check_cmd('publish', channel, '') then
    return 'VRC_NOPERM the Redis user may not publish on ' .. channel
        .. ': grant the ACL rule set in the README section Security'
  end
  return nil
end
