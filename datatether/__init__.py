"""datatether: real-time replication and failover for Linux on an ordered event log.

The source folders of the repository map into this package: ``engine/`` is
``datatether.engine``, ``apply/`` is ``datatether.apply``, ``capture/`` is
``datatether.capture``, ``tools/`` is ``datatether.tools`` and ``schemas/`` is
``datatether.schemas`` (see pyproject.toml).
"""

__version__ = "0.1.0"
