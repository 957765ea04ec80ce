--[[
  delete.lua: remove entries of one shard from every tier, optionally only at an expected version.

  KEYS[1..4]  the shard's l2, l3, exp and stats keys (see includes/shard.lua)
  ARGV[1..8]  the common header (now ms, capacities, idle ttls ms, promote_after, L1 deltas)
  ARGV[9..]   pairs, one per entry:
                id                entry id
                expected_version  delete only if the entry still has this version; empty = any

  Reply: { {promotions, demotions, evictions, expirations}, deleted_1, deleted_2, ... }
    deleted_i = 1 when an entry was removed, 0 when there was none (or its version differed)
]]
-- @include "includes/shard.lua"

local err = check_head()
if err then return redis.error_reply(err) end
local n_args = #ARGV - HEAD
if n_args < 2 or n_args % 2 ~= 0 then
  return redis.error_reply('VRC_BADARG delete needs pairs of (id, expected_version)')
end
for i = HEAD + 1, #ARGV, 2 do
  if string.len(ARGV[i]) == 0 or (ARGV[i + 1] ~= '' and not arg_int(i + 1, 1)) then
    return redis.error_reply('VRC_BADARG delete: empty id or expected_version not a positive integer')
  end
end

sweep()

local deleted, count = {0}, 0
for i = HEAD + 1, #ARGV, 2 do
  local id, expected = ARGV[i], tonumber(ARGV[i + 1])
  local tier = nil
  if redis.call('ZSCORE', l2_key, id) then tier = 2 elseif redis.call('ZSCORE', l3_key, id) then tier = 3 end
  local version = tonumber(redis.call('HGET', entry_key(id), 'ver'))
  local d = 0
  if (tier or version) and (expected == nil or expected == version) then
    drop(id, tier)
    d = 1
  end
  deleted[#deleted + 1] = d
  count = count + d
end

enforce_bounds()
deleted[1] = flush_stats({deletes = count})
return deleted
