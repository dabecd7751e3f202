"""Live migration.

``stream/`` is QEMU's stream format, sans-IO (reader, writer, return path);
``state`` the status table, capabilities and parameters; ``channels`` the
byte pipes; ``outgoing`` and ``incoming`` the two directions; ``manager`` the
facade QMP commands call.  The daemon passes in what migration uses, typed by
the Protocols in ``deps``; nothing here imports the daemon or the commands.
"""
