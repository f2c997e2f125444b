-- A GCRA limiter shared by every node: KEYS[1] holds the theoretical arrival time (ms).
-- ARGV: milliseconds per unit, burst. Returns 0 (allowed) or the milliseconds to wait.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local emission, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local next_tat = tat + emission
local allowed_at = next_tat - emission * burst
if now < allowed_at then return math.ceil(allowed_at - now) end
redis.call('SET', KEYS[1], tostring(next_tat), 'PX', math.ceil(next_tat - now))
return 0
