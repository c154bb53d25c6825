"""The bridge on PipeWire: the user's server and what to load into it (``server``), the host side
(``bridge``), its supervisor process (``supervisor``), the manager's sockets decided from outside
(``sockhook``: bind and joins; ``rxqueue``: the receive queue), the round trip (``measure``) and a
headless PipeWire for the demo and tests (``headless``)."""
