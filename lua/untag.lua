#!lua flags=allow-oom
--[[
  untag.lua: remove the shard's entries that carry any of the given tags, up to `batch` of them, and
  tell every process to drop its L1 copies. invalidate_tags() calls it on every shard, again while
  entries are left, so a huge tag never blocks Redis for long.

  Runs when Redis is out of memory (flag allow-oom): it only removes.

  KEYS[1]     the shard's l2 key; the shard's other keys derive from it (see includes/shard.lua)
  ARGV[1..7]  the common header (now ms, capacities, idle ttls ms, promote_after, memory ms)
  ARGV[8]     batch: entries this call removes at most (>= 1)
  ARGV[9..]   tag names (1 to 256 bytes each, at least one)

  Each entry removed is deleted as delete.lua deletes it: from every index, with its tag records (so
  from the sets of its other tags too), fenced (a fill that started before is refused) and announced
  with a new version. An id a tag's set holds without an entry (Redis dropped the entry's data) only
  loses its tag records. A tag's set written by hand with another type is refused before anything is
  written.

  Reply: { {promotions, demotions, evictions, expirations, now}, removed, left, id_1, version_1, ... }
    removed = entries removed by this call; left = ids the tags' sets still hold (0 = done); then each
    removed entry's id and the version announced for it (the caller's own L1 drops them at once)
]]
-- @include "includes/shard.lua"

local err = check_head()
if err then return redis.error_reply(err) end
local batch, names = arg_int(HEAD + 1, 1), {}
for i = HEAD + 2, #ARGV do
  local len = string.len(ARGV[i])
  if len < 1 or len > MAX_TAG_BYTES then batch = nil end
  names[#names + 1] = ARGV[i]
end
if not batch or #names == 0 then
  return redis.error_reply('VRC_BADARG untag needs a batch >= 1 and tag names of 1 to ' .. MAX_TAG_BYTES .. ' bytes')
end
local wrong = check_tag_types(names)
if wrong then return redis.error_reply(wrong) end

local removed, left, announced = 0, 0, {}
for _, name in ipairs(names) do
  local key = tag_key(name)
  if batch > removed then
    for _, id in ipairs(redis.call('SRANDMEMBER', key, batch - removed)) do
      local tier = tier_of(id)
      if tier or redis.call('EXISTS', entry_key(id)) == 1 then
        drop(id, tier, 'deleted')                    -- its tag records too
        local version = next_version()
        announce(id, version)
        announced[#announced + 1] = id
        announced[#announced + 1] = version
        removed = removed + 1
      else
        untag(id)
      end
      redis.call('SREM', key, id)                    -- (a record the tags hash had lost)
    end
  end
  left = left + redis.call('SCARD', key)
end

local reply = {finish({deletes = removed}), removed, left}
for _, x in ipairs(announced) do reply[#reply + 1] = x end
return reply
