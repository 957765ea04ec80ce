#!lua flags=allow-oom
--[[
  delete.lua: remove entries of one shard from every tier, optionally only at an expected version,
  and tell every process to drop its L1 copy.

  Runs when Redis is out of memory (flag allow-oom): deleting frees memory, and a full Redis must still
  let the cache remove what it holds. What it adds (a `fence` record per id, a few counters) is small.

  KEYS[1]     the shard's l2 key; the shard's other keys derive from it (see includes/shard.lua)
  ARGV[1..7]  the common header (now ms, capacities, idle ttls ms, promote_after, memory ms)
  ARGV[8..]   pairs, one per entry:
                id                entry id
                expected_version  delete only if the entry still has this version; empty = any

  A deleted id gets a `fence` record, even when nothing was stored under it, so a fill that started
  before the delete is refused (cache-aside: update the source of truth, then delete the key). Every
  delete without an expected version is announced with a new version, whether or not Redis held the
  entry: some process may hold a copy of a value Redis no longer has (evicted, or written while this
  Redis was away). A conditional delete is announced when it removed the entry.

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

local deleted, removed = {0}, 0
for i = HEAD + 1, #ARGV, 2 do
  local id, expected = ARGV[i], tonumber(ARGV[i + 1])
  local tier = tier_of(id)
  local version = tonumber((entry_fields(entry_key(id), 'ver') or {})[1])
  local d, announced = 0, 0
  if (tier or version) and (expected == nil or expected == version) then
    drop(id, tier, 'deleted')
    d = 1
  elseif expected == nil then
    fence(id, now)
    untag(id)                                        -- tag records an entry Redis dropped left behind
  end
  if d == 1 or expected == nil then
    announced = next_version()
    announce(id, announced)
  end
  deleted[#deleted + 1] = {d, announced}
  removed = removed + d
end

-- Sweeping frees memory too; growing nothing, it is safe under allow-oom.
sweep()
enforce_bounds()
deleted[1] = finish({deletes = removed})
return deleted
