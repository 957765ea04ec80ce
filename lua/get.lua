#!lua
--[[
  get.lua: look up entries of one shard in L2 and L3 in one call, counting hits and moving tiers.

  KEYS[1..7]  the shard's l2, l3, exp, stats, gone, fence and ghost keys (see includes/shard.lua)
  ARGV[1..9]  the common header (now ms, capacities, idle ttls ms, promote_after, L1 deltas, memory ms)
  ARGV[10..]  entry ids to look up (one or more)

  For each id, in order:
    * absent, data gone, past its absolute expiry, or idle past its tier's ttl -> a miss
      (the last two also remove or demote it, as the sweep would have);
    * a version, size, expiry, hit count or cost that is not an integer (written by hand) -> a
      miss, and the entry is removed;
    * in L2 -> an L2 hit; its score becomes now (a new stamp);
    * in L3 -> an L3 hit; when its hit count reaches promote_after it moves to L2 (promotion),
      otherwise its L3 score becomes now (a new stamp).
  Every hit increments the entry's fleet-wide hit count `n`. The first hit of a prewarmed entry
  (field w) counts `prewarm_useful` in the shard's stats and clears the mark.

  Reply: { {promotions, demotions, evictions, expirations, now_ms},  -- caused by this call; its time
           {0, now_ms}                                         -- a miss, and when it was seen
           {0, now_ms, 1}                                      -- a miss: a corrupt entry was removed
           {tier, payload, fill_l1, ttl_left_ms, version, cost_ms},   -- a hit: tier 2 = L2, 3 = L3
           ... }                                               -- one reply per id, in order
    fill_l1 = 1 when the entry is still in L2 after this call and its count >= promote_after
    ttl_left_ms = ms until its absolute expiry, -1 when it has none
    cost_ms = how long the value took to compute (0 = unknown), for early refresh
]]
-- @include "includes/shard.lua"

local err = check_head()
if err then return redis.error_reply(err) end
if #ARGV <= HEAD then return redis.error_reply('VRC_BADARG get needs at least one entry id') end
for i = HEAD + 1, #ARGV do
  if string.len(ARGV[i]) == 0 then return redis.error_reply('VRC_BADARG get: empty entry id') end
end

sweep()

local results, l2_hits, l3_hits, misses, useful, ghost_hits, tail_hits = {}, 0, 0, 0, 0, 0, 0
for i = HEAD + 1, #ARGV do
  local id = ARGV[i]
  local ek = entry_key(id)
  local s2 = redis.call('ZSCORE', l2_key, id)
  local s3 = nil
  if s2 then s2 = tonumber(s2) else s3 = tonumber(redis.call('ZSCORE', l3_key, id)) end
  local reply = {0, now}
  if s2 or s3 then
    local f = entry_fields(ek, 'v', 'ver', 'x', 's', 'd', 'w', 'n') or {}
    local expiry = tonumber(f[3])
    if not f[1] then                                   -- data gone (evicted by Redis, or by hand)
      redis.call('ZREM', s2 and l2_key or l3_key, id)
      redis.call('ZREM', exp_key, id)
    elseif not (f[2] and int_or_absent(f[2]) and int_or_absent(f[3]) and int_or_absent(f[4])
                and int_or_absent(f[5]) and int_or_absent(f[7])) then
      drop(id, s2 and 2 or 3, 'corrupt')               -- fields written by hand: not an entry any more
      reply = {0, now, 1}
    elseif expiry and now >= expiry then               -- absolute ttl passed
      drop(id, s2 and 2 or 3, 'expired', expiry)
    else
      if s2 and idle2 > 0 and now - s2 >= idle2 then   -- idle in L2: it belongs to L3 by now
        s3, s2 = s2 + idle2, nil
        into_l3(id, s3)
      end
      if s3 and idle3 > 0 and now - s3 >= idle3 then   -- idle in L3: it is gone
        drop(id, 3, 'idle', s3 + idle3)
      else
        local n = redis.call('HINCRBY', ek, 'n', 1)
        if f[6] then
          redis.call('HDEL', ek, 'w')
          useful = useful + 1
        end
        local tier, in_l2 = 2, true
        if s2 then
          redis.call('ZADD', l2_key, stamp(), id)
          l2_hits = l2_hits + 1
        else
          tier = 3
          l3_hits = l3_hits + 1
          if redis.call('ZCOUNT', l3_key, '-inf', '(' .. s3) < sizing_step() then tail_hits = tail_hits + 1 end
          if n >= promote_after then
            local size = tonumber(f[4]) or 0
            redis.call('ZREM', l3_key, id)
            redis.call('ZADD', l2_key, stamp(), id)
            bytes3, bytes2 = bytes3 - size, bytes2 + size
            ev.promotions = ev.promotions + 1
          else
            redis.call('ZADD', l3_key, stamp(), id)
            in_l2 = false
          end
        end
        local fill = 0
        if in_l2 and n >= promote_after then fill = 1 end
        reply = {tier, f[1], fill, expiry and (expiry - now) or -1, tonumber(f[2]), tonumber(f[5]) or 0}
      end
    end
  else
    redis.call('DEL', ek)                              -- data without an index entry is never valid
  end
  if reply[1] == 0 then
    misses = misses + 1
    if redis.call('ZREM', ghost_key, id) == 1 then ghost_hits = ghost_hits + 1 end
  end
  results[#results + 1] = reply
end

enforce_bounds()
-- A later promotion in this call may have pushed an entry back down: only what is still in L2 fills
-- L1, and an entry that may now live in some L1 is marked (f = 1) so that its removal is remembered.
local fills = 0
for i, r in ipairs(results) do
  if r[1] ~= 0 and r[3] == 1 then
    local id = ARGV[HEAD + i]
    if redis.call('ZSCORE', l2_key, id) then
      redis.call('HSET', entry_key(id), 'f', 1)
      fills = fills + 1
    else
      r[3] = 0
    end
  end
end
table.insert(results, 1, finish({l2_hits = l2_hits, l3_hits = l3_hits, misses = misses, l1_fills = fills,
                                 ghost_hits = ghost_hits, tail_hits = tail_hits,
                                 prewarm_useful = useful}))
return results
