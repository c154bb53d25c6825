"""Audio: the NETJACK bridge on two backends, ``jack2/`` and ``pipewire/``, over what they share (``link``,
``placement``), the choice between them (``servers``), and the latency budget, soak and tuner."""
