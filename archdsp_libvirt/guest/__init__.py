"""What runs in the DSP VM's own guest: its NETJACK slave, as a systemd unit (:mod:`.unit`) or a NixOS
module (:mod:`.nixos`).

The link's settings are not in either: the slave's helper (``netjack-slave.sh``, a POSIX sh script)
reads them at every start from the domain's SMBIOS OEM string (the credential ``archdsp.netjack``,
:mod:`archdsp_libvirt.domain.contract`, docs/guest-contract.md), so one unit serves any config. The
config names the guest the text was printed for; options decide what is the guest's own (its jackd's
real-time priority, the user it runs as).
"""
