--[[
  includes/acl.lua: refuse, before the first write, a call whose ACL user may not run every command
  the script may run. Redis checks permissions command by command inside a script, so a denied
  command midway would fail the call after some of its writes; this checks them all up front
  (redis.acl_check_cmd, Redis >= 7.0), each with well-formed arguments on one of the call's keys:
  Redis does not check arity there, and with arguments missing Redis 7.0 reads stale ones for some
  commands (SET, ZUNIONSTORE), which gives a random answer.
]]
local ACL_ARGS = {  -- the arguments after the key, per command (absent: the key alone)
  hget = {'f'}, hmget = {'f'}, hset = {'f', 'v'}, hsetnx = {'f', 'v'}, hincrby = {'f', '1'}, hdel = {'f'},
  hexists = {'f'}, zadd = {'1', 'm'}, zrem = {'m'}, zscore = {'m'}, zincrby = {'1', 'm'}, zrange = {'0', '1'},
  zrangebyscore = {'0', '1'}, zcount = {'0', '1'}, zremrangebyscore = {'0', '1'}, zremrangebyrank = {'0', '1'}, lrange = {'0', '1'},
  ltrim = {'0', '1'}, lpush = {'v'}, pexpire = {'1'}, pexpireat = {'1'}, hstrlen = {'f'}, set = {'v'}, zunionstore = {'1', '<key>'}, zmscore = {'m'},
}
local KEYLESS = {time = true}

-- An error message naming the first command (or the channel) the user may not use, or nil.
local function check_commands(commands, key, channel)
  if not redis.acl_check_cmd then return nil end  -- an emulator without ACLs (fakeredis)
  for _, command in ipairs(commands) do
    local args = {}
    if not KEYLESS[command] then
      args[1] = key
      for _, a in ipairs(ACL_ARGS[command] or {}) do args[#args + 1] = (a == '<key>') and key or a end
    end
    if not redis.acl_check_cmd(command, unpack(args)) then
      return 'VRC_NOPERM the Redis user may not run ' .. string.upper(command) .. ' on ' .. key
          .. ', which the cache needs: grant the ACL rule set in the README section Security'
    end
  end
  if channel and not redis.acl_check_cmd('spublish', channel, 'x') then
    return 'VRC_NOPERM the Redis user may not SPUBLISH on ' .. channel
        .. ': grant the ACL rule set in the README section Security'
  end
  return nil
end
