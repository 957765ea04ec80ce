#!lua
--[[
  sizing.lua: the fleet sizing lease, and the L2/L3 capacities every worker uses (adaptive_redis).

  Every worker calls this now and then. One worker at a time holds the lease (renewed on each of its
  calls, taken over by another once it lapses: a worker that dies hands the role on), and only the
  holder is told, once per interval, that a decision is due: it then reads the fleet counters and
  writes the new capacities (plain HSET, see fleet_sizing.py). Times are the callers' clock, so
  tests can pass a fake one.

  KEYS[1]  <ns>:sizing  HASH  holder = lease token, until = lease end (ms), decided_at (ms),
                              l2_size, l3_size (capacities in force, entries, whole namespace),
                              snap_hits, snap_misses, snap_ghost_hits, snap_tail_hits (fleet counters
                              at the last decision), decisions (how many so far)
  ARGV[1]  token, the caller's random token (non-empty)
  ARGV[2]  now, ms (>= 1)
  ARGV[3]  lease, ms (>= 1): how long the holder keeps the role without calling again
  ARGV[4]  interval, ms (>= 1): time between two decisions

  Reply: {holder, due, l2_size, l3_size, snap_hits, snap_misses, snap_ghost_hits, snap_tail_hits}
    holder = 1 if the caller holds the lease now; due = 1 if it must decide now (decided_at is set
    to now: nobody else decides in this interval); the rest as stored (false when never written)
]]
-- @include "includes/acl.lua"

local key, token = KEYS[1], ARGV[1]
local now, lease, interval = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if #KEYS ~= 1 or not token or string.len(token) == 0 or not (now and lease and interval) or now < 1 or lease < 1
    or interval < 1 then
  return redis.error_reply('VRC_BADARG sizing: a non-empty token and now, lease and interval >= 1 ms')
end
local denied = check_commands({'type', 'hmget', 'hset'}, key, nil)
if denied then return redis.error_reply(denied) end
local t = redis.call('TYPE', key).ok
if t ~= 'none' and t ~= 'hash' then
  return redis.error_reply('VRC_WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not a hash: delete that key')
end

local f = redis.call('HMGET', key, 'holder', 'until', 'decided_at', 'l2_size', 'l3_size', 'snap_hits',
                     'snap_misses', 'snap_ghost_hits', 'snap_tail_hits')
local holder = f[1] == token or not tonumber(f[2]) or tonumber(f[2]) <= now
local due = 0
if holder then
  redis.call('HSET', key, 'holder', token, 'until', now + lease)
  local decided = tonumber(f[3])
  if not decided or now - decided >= interval then
    redis.call('HSET', key, 'decided_at', now)
    due = 1
  end
end
return {holder and 1 or 0, due, f[4], f[5], f[6], f[7], f[8], f[9]}
