"""UNMERGE's built-in plugins: every algorithm lives here, registered through the ``unmerge`` entry points."""
