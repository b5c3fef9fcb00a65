"""The edge agent's own MQTT 5 client: a sans-IO codec and the asyncio protocol on top of it."""
