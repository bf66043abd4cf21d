"""Broker feed clients: connect, subscribe, heartbeat watchdog, reconnect. Protocol only."""
