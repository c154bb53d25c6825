"""The bridge on JACK2: its ``netmanager`` loaded into a jackd (``bridge``) and a supervisor that
gives the slave's ports the names both backends share (``supervisor``)."""
