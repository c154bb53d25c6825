"""The domain: policy (decisions), render (mapping to XML) and schema (libvirt's RelaxNG).

:mod:`.build` runs them in that order: config + host model -> plan -> XML -> validated.
"""
