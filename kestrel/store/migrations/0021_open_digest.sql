-- One open digest per channel (issue 13, ADR-0019 amended): the first delivery a channel's rate limit folds opens a
-- digest that goes out one window later; later folds join it until it is claimed for sending (attempts > 0), so a
-- storm becomes one message however it falls on the clock. Workers fold under the channel's advisory lock; this
-- index makes a second open digest of one channel impossible all the same, and finds the open one.
CREATE UNIQUE INDEX deliveries_open_digest ON deliveries (tenant_id, channel_id)
    WHERE kind = 'digest' AND status = 'pending' AND attempts = 0;
