-- Claim jobs for one worker in one round trip (arq claims each job with its
-- own WATCH / EXISTS / ZSCORE / MULTI, four round trips, and a worker that
-- loses the race has paid three of them for nothing).
--
-- A job is claimed as arq claims it: it is due (in the queue with a score not
-- in the future) and no worker runs it (no arq:in-progress:<id> key); claiming
-- writes that key with the in-progress time-to-live. A script runs alone, so
-- no two workers claim the same job. "Due" is by the Redis server's clock
-- (TIME), the clock every score is written by: never the worker's own.
--
-- KEYS[1]        the queue (sorted set)
-- ARGV[1]        in-progress key time-to-live (ms)
-- ARGV[1+i]      candidate job id i
-- Returns {job id, score, job id, score, ...} of the jobs claimed, in candidate order.
local queue, ttl = KEYS[1], ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local claimed = {}
for i = 2, #ARGV do
    local id = ARGV[i]
    local score = redis.call('ZSCORE', queue, id)
    if score and tonumber(score) <= now and redis.call('EXISTS', 'arq:in-progress:' .. id) == 0 then
        redis.call('PSETEX', 'arq:in-progress:' .. id, ttl, '1')
        claimed[#claimed + 1] = id
        claimed[#claimed + 1] = score
    end
end
return claimed
