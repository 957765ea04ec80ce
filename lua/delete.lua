#!lua
--[[
  delete.lua: remove entries of one shard from every tier, optionally only at an expected version,
  and tell every process to drop its L1 copy.

  KEYS[1..7]  the shard's l2, l3, exp, stats, gone, fence and ghost keys (see includes/shard.lua)
  ARGV[1..9]  the common header (now ms, capacities, idle ttls ms, promote_after, L1 deltas, memory ms)
  ARGV[10..]  pairs, one per entry:
                id                entry id
                expected_version  delete only if the entry still has this version; empty = any

  A deleted id gets a `fence` record, even when nothing was stored under it, so a fill that started
  before the delete is refused (cache-aside: update the source of truth, then delete the key).
  Deleting an entry publishes an invalidation with a new version; so does deleting an absent id
  that has a `gone` record (some L1 may still hold a copy of it), which clears that record.

  Reply: { {promotions, demotions, evictions, expirations, now}, {deleted_1, version_1}, ... }
    deleted_i = 1 when an entry was removed, 0 when there was none (or its version differed)
    version_i = the version announced to every L1 (0 = nothing announced)
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
  local version = tonumber((entry_fields(entry_key(id), 'ver') or {})[1])
  local d, announced = 0, 0
  if (tier or version) and (expected == nil or expected == version) then
    drop(id, tier, 'deleted')
    d = 1
  elseif expected == nil then
    note_removal(id, false)
  end
  if d == 1 or (expected == nil and redis.call('ZREM', gone_key, id) == 1) then
    announced = next_version()
    announce(id, announced)
  end
  deleted[#deleted + 1] = {d, announced}
  count = count + d
end

enforce_bounds()
deleted[1] = finish({deletes = count})
return deleted
