"""The edge device runtime: drivers, signing, durable outbox, MQTT link, edge rules."""
