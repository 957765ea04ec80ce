--[[
  flush.lua: remove up to `batch` entries of one shard; called repeatedly by invalidate() until the
  shard is empty, so clearing a huge namespace never blocks Redis for long.

  KEYS[1]  <ns>:{<tag>}:l2     ZSET  (see includes/shard.lua)
  KEYS[2]  <ns>:{<tag>}:l3     ZSET
  KEYS[3]  <ns>:{<tag>}:exp    ZSET
  KEYS[4]  <ns>:{<tag>}:stats  HASH  byte totals are lowered; counters are kept
  ARGV[1]  batch, entries to remove in this call (>= 1)

  Reply: entries left in the shard's indexes after this call (0 = the shard is empty)
]]
local l2_key, l3_key, exp_key, stats_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local base = string.sub(l2_key, 1, -3)
local batch = tonumber(ARGV[1])
if not string.match(ARGV[1] or '', '^%d+$') or string.len(ARGV[1]) > 9 or batch < 1 then
  return redis.error_reply('VRC_BADARG flush: batch must be a positive integer')
end

local budget = batch
for _, tier in ipairs({{l2_key, 'l2_bytes'}, {l3_key, 'l3_bytes'}, {exp_key, nil}}) do
  if budget <= 0 then break end
  local ids = redis.call('ZRANGE', tier[1], 0, budget - 1)
  local freed = 0
  for _, id in ipairs(ids) do
    local ek = base .. 'e:' .. id
    freed = freed + (tonumber(redis.call('HGET', ek, 's')) or 0)
    redis.call('DEL', ek)
    redis.call('ZREM', tier[1], id)
    redis.call('ZREM', exp_key, id)
  end
  if tier[2] and freed > 0 then redis.call('HINCRBY', stats_key, tier[2], -freed) end
  budget = budget - #ids
end

local left = redis.call('ZCARD', l2_key) + redis.call('ZCARD', l3_key) + redis.call('ZCARD', exp_key)
if left == 0 and redis.call('EXISTS', stats_key) == 1 then        -- heal any drift (see README)
  redis.call('HSET', stats_key, 'l2_bytes', 0, 'l3_bytes', 0)
end
return left
