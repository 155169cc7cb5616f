-- A delivered command whose device connected again (issue 12, ADR-0013 amended): its final answer may have been lost
-- with the old connection or with a crashed broker (Mosquitto acknowledges a QoS 1 message before its next autosave;
-- a device's in-flight answer dies with its connection). devicesvc sets the flag on the device's connect event and
-- asks once more, with ``answer_only`` so that the device answers from memory and never runs the command again.
ALTER TABLE commands ADD COLUMN answer_wanted boolean NOT NULL DEFAULT false;
CREATE INDEX commands_answer_wanted ON commands (device_id) WHERE answer_wanted;
