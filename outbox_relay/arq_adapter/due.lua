-- A worker's look at the queue by the Redis server's clock (TIME), the clock
-- every score is written by (enqueue.lua, settle.lua): arq reads the due jobs
-- by the worker's own clock, and a worker whose clock is behind would leave
-- them waiting. Reads only.
--
-- KEYS[1]        the queue (sorted set)
-- ARGV[1]        offset into the due jobs
-- ARGV[2]        how many due job ids to return at most (0: none, only the wait)
-- Returns {ms until the next job not yet due is due (-1: none), due job id, ...}.
local queue = KEYS[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local reply = {-1}
local upcoming = redis.call('ZRANGEBYSCORE', queue, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #upcoming > 0 then
    reply[1] = tonumber(upcoming[2]) - now
end
if tonumber(ARGV[2]) > 0 then
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'LIMIT', ARGV[1], ARGV[2])) do
        reply[#reply + 1] = id
    end
end
return reply
