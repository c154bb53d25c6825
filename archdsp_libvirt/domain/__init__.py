"""The domain: policy (decisions), render (mapping to XML), schema (libvirt's RelaxNG) and drift.

:mod:`.build` runs them in that order: config + host model -> plan -> XML -> validated.
"""
