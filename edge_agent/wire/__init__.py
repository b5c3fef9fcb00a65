"""The shared, sans-IO contract of Bluelight: identities, topics, the signed envelope and
the data model. Every runtime (agent, gateway, app, simulator) imports it; it never
touches a socket, a file or the clock."""
