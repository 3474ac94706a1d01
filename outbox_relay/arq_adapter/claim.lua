-- Claim jobs for one worker in one round trip (arq claims each job with its
-- own WATCH / EXISTS / ZSCORE / MULTI, four round trips, and a worker that
-- loses the race has paid three of them for nothing).
--
-- A job is claimed as arq claims it: it is due (in the queue with a score not
-- in the future) and no worker runs it (no arq:in-progress:<id> key); claiming
-- writes that key with the in-progress time-to-live. A script runs alone, so
-- no two workers claim the same job.
--
-- KEYS[1]        the queue (sorted set)
-- ARGV[1]        now (ms)
-- ARGV[2]        in-progress key time-to-live (ms)
-- ARGV[2+i]      candidate job id i
-- Returns {job id, score, job id, score, ...} of the jobs claimed, in candidate order.
local queue, now, ttl = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local claimed = {}
for i = 3, #ARGV do
    local id = ARGV[i]
    local score = redis.call('ZSCORE', queue, id)
    if score and tonumber(score) <= now and redis.call('EXISTS', 'arq:in-progress:' .. id) == 0 then
        redis.call('PSETEX', 'arq:in-progress:' .. id, ttl, '1')
        claimed[#claimed + 1] = id
        claimed[#claimed + 1] = score
    end
end
return claimed
