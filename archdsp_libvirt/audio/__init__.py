"""Audio: the NETJACK bridge (controller, server backends, supervisor) and the latency budget."""
