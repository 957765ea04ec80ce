#!lua flags=allow-oom
--[[
  flush.lua: remove up to `batch` entries of one shard; called repeatedly by invalidate() until the
  shard is empty, so clearing a huge namespace never blocks Redis for long. Every call publishes
  "*<shard> <version>" on the shard's channel <ns>:{<tag>}:inval (SPUBLISH: every process drops its
  L1 copies of this shard older than that version) and marks the shard flushed, so a fill that
  started before the flush is refused.

  Runs when Redis is out of memory (flag allow-oom): it only removes, and clearing a namespace is how
  an operator frees a full Redis.

  KEYS[1]  the shard's l2 key; the shard's other keys derive from it (see includes/shard.lua)
  ARGV[1]  batch, entries to remove in this call (>= 1)
  ARGV[2]  now, ms since the epoch (0 = the server's TIME)
  ARGV[3]  the shard's index (for the invalidation message)

  The byte totals are lowered and `flushed` and `flushed_ver` (the version announced) set; the fleet
  counters are kept. Entries' tag records go with them. Once the shard's indexes are empty, its
  `size`, `fence` and `ghost` keys and any tag record left are removed and its byte totals reset
  (which heals any drift).

  Reply: entries left in the shard's indexes after this call (0 = the shard is empty)
]]
-- @include "includes/shard.lua"

if #KEYS ~= 1 or string.sub(l2_key, -4) ~= '}:l2' or not string.find(l2_key, ':{', 1, true) then
  return redis.error_reply('VRC_BADARG flush: KEYS[1] must be a shard\'s l2 key')
end
for i = 1, 3 do
  if not arg_int(i, 0) then
    return redis.error_reply('VRC_BADARG flush: batch, now and shard must be non-negative integers')
  end
end
local batch = tonumber(ARGV[1])
now = tonumber(ARGV[2])
if batch < 1 then return redis.error_reply('VRC_BADARG flush: batch must be >= 1') end
local wrong = check_shard_types() or check_commands(SHARD_COMMANDS, l2_key, channel)
if wrong then return redis.error_reply(wrong) end
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

redis.call('HSET', stats_key, 'flushed', now)
local budget = batch
for _, tier in ipairs({{l2_key, 'l2_bytes'}, {l3_key, 'l3_bytes'}, {exp_key, nil}}) do
  if budget <= 0 then break end
  local ids = redis.call('ZRANGE', tier[1], 0, budget - 1)
  local freed = 0
  for _, id in ipairs(ids) do
    freed = freed + take_size(id)
    redis.call('DEL', entry_key(id))
    redis.call('ZREM', tier[1], id)
    redis.call('ZREM', exp_key, id)
    untag(id)
  end
  if tier[2] and freed > 0 then count(tier[2], -freed) end
  budget = budget - #ids
end

local left = redis.call('ZCARD', l2_key) + redis.call('ZCARD', l3_key) + redis.call('ZCARD', exp_key)
if left == 0 then
  redis.call('HSET', stats_key, 'l2_bytes', 0, 'l3_bytes', 0)
  redis.call('DEL', size_key, fence_key, ghost_key)
  if has_tags() then                                 -- records of entries Redis dropped unindexed
    for _, id in ipairs(redis.call('HKEYS', tags_key)) do untag(id) end
  end
end
local version = next_version()
-- Entries written before this version are invalid (touch.lua will not adopt one Redis left unindexed).
redis.call('HSET', stats_key, 'flushed_ver', version)
redis.call('SPUBLISH', channel, '*' .. ARGV[3] .. ' ' .. string.format('%d', version))
return left
