#!lua
--[[
  flush.lua: remove up to `batch` entries of one shard; called repeatedly by invalidate() until the
  shard is empty, so clearing a huge namespace never blocks Redis for long. Every call publishes
  "*<shard> <version>" on <ns>:inval (every process drops its L1 copies of this shard older than
  that version) and marks the shard flushed, so a fill that started before the flush is refused.

  KEYS[1]  <ns>:{<tag>}:l2     ZSET  (see includes/shard.lua; a key of another type is refused, VRC_WRONGTYPE)
  KEYS[2]  <ns>:{<tag>}:l3     ZSET
  KEYS[3]  <ns>:{<tag>}:exp    ZSET
  KEYS[4]  <ns>:{<tag>}:stats  HASH  byte totals are lowered and `flushed` set; counters are kept
  KEYS[5]  <ns>:{<tag>}:gone   ZSET  removed once the shard is empty (every L1 was cleared)
  KEYS[6]  <ns>:{<tag>}:fence  ZSET  removed once the shard is empty (`flushed` refuses older fills)
  KEYS[7]  <ns>:{<tag>}:ghost  ZSET  removed once the shard is empty
  ARGV[1]  batch, entries to remove in this call (>= 1)
  ARGV[2]  now, ms since the epoch (0 = the server's TIME)
  ARGV[3]  the shard's index (for the invalidation message)

  Reply: entries left in the shard's indexes after this call (0 = the shard is empty)
]]
-- @include "includes/shard.lua"

for i = 1, 3 do
  if not string.match(ARGV[i] or '', '^%d+$') or string.len(ARGV[i]) > 16 then
    return redis.error_reply('VRC_BADARG flush: batch, now and shard must be non-negative integers')
  end
end
local batch = tonumber(ARGV[1])
now = tonumber(ARGV[2])
if batch < 1 then return redis.error_reply('VRC_BADARG flush: batch must be >= 1') end
local wrong = check_shard_types() or check_commands(SHARD_COMMANDS, KEYS[1], channel)
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
    local ek = base .. 'e:' .. id
    local size = redis.pcall('HGET', ek, 's')            -- a key of another type frees nothing
    freed = freed + (type(size) == 'string' and tonumber(size) or 0)
    redis.call('DEL', ek)
    redis.call('ZREM', tier[1], id)
    redis.call('ZREM', exp_key, id)
  end
  if tier[2] and freed > 0 then redis.call('HINCRBY', stats_key, tier[2], -freed) end
  budget = budget - #ids
end

local left = redis.call('ZCARD', l2_key) + redis.call('ZCARD', l3_key) + redis.call('ZCARD', exp_key)
if left == 0 then                                    -- heal any byte-total drift (see README)
  redis.call('HSET', stats_key, 'l2_bytes', 0, 'l3_bytes', 0)
  redis.call('DEL', gone_key, fence_key, ghost_key)
end
-- Versions grow across a flushed or restarted Redis (see next_version in includes/shard.lua).
redis.call('HSETNX', stats_key, 'seq', string.format('%d', now * 1000))
local version = redis.call('HINCRBY', stats_key, 'seq', 1)
redis.call('PUBLISH', channel, '*' .. ARGV[3] .. ' ' .. string.format('%d', version))
return left
