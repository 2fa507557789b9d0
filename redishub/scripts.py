"""Lua scripts: the steps that must see and change the registry in one atomic step.

Whether a segment is a call's first (its start is the public `call_started`) or its last (its
end is the public `call_ended`) depends on the other instances' segments of that call. Two
instances of a handover can start or end at the same moment; run inside Redis, each script
sees the other's effect entirely or not at all, so exactly one start and one end are public.

They read keys named at run time (other instances' `alive` and `owned` keys), which a single
Redis (or a Sentinel-managed primary) allows and Redis Cluster does not: README "Scaling out".
"""

# A segment begins. KEYS: call stream, lifecycle stream, own owned hash, instances set.
# ARGV: prefix, instance, segment, callSid, this segment's call_started, delivered here ("1"/"0"),
#       call stream MAXLEN, lifecycle MAXLEN, call stream expiry (ms).
# Returns {public ("1"/"0"), id of the start entry, the call's call_started}.
OPEN_SEGMENT = """
local prefix, me, segment, sid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local started = nil
for _, other in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if other ~= me and redis.call('EXISTS', prefix .. 'alive:' .. other) == 1 then
    local value = redis.call('HGET', prefix .. 'owned:' .. other, sid)
    if value then
      started = cjson.decode(value)['d']
      break
    end
  end
end
local public = '0'
if started == nil then
  public = '1'
  started = ARGV[5]
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[7], '*',
  'o', me, 'g', segment, 'n', 0, 'k', 'start', 'd', ARGV[5], 'p', public, 'l', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[9])
redis.call('HSET', KEYS[3], sid, cjson.encode({g = tonumber(segment), i = id, d = started}))
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*',
  'k', 'start', 'c', sid, 'o', me, 'g', segment, 'p', public, 'i', id, 'd', started)
return {public, id, started}
"""

# A segment ends. KEYS: as OPEN_SEGMENT.
# ARGV: prefix, instance, segment, callSid, entry number, call_ended, delivered here ("1"/"0"),
#       call stream MAXLEN, lifecycle MAXLEN, history expiry (ms).
# Returns {public, id of the end entry}.
CLOSE_SEGMENT = """
local prefix, me, segment, sid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
redis.call('HDEL', KEYS[3], sid)
local public = '1'
for _, other in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if other ~= me and redis.call('EXISTS', prefix .. 'alive:' .. other) == 1
      and redis.call('HEXISTS', prefix .. 'owned:' .. other, sid) == 1 then
    public = '0'
    break
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[8], '*',
  'o', me, 'g', segment, 'n', ARGV[5], 'k', 'end', 'd', ARGV[6], 'p', public, 'l', ARGV[7])
if public == '1' then
  redis.call('PEXPIRE', KEYS[1], ARGV[10])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*',
  'k', 'end', 'c', sid, 'o', me, 'g', segment, 'p', public, 'i', id, 'd', ARGV[6])
return {public, id}
"""

# Every instance's segments, whether it is alive, and the lifecycle stream's last id, at one
# instant. KEYS: instances set, lifecycle stream. ARGV: prefix.
# Returns {last lifecycle id or "", {instance, alive (0/1), {callSid, value, ...}}, ...}.
SNAPSHOT = """
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local out = {last[1] and last[1][1] or ''}
for _, instance in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = {instance, redis.call('EXISTS', ARGV[1] .. 'alive:' .. instance),
                   redis.call('HGETALL', ARGV[1] .. 'owned:' .. instance)}
end
return out
"""
