"""The rule workers (issue 13): alarm rules evaluated on device data from JetStream; alarms, actions, notifications."""
