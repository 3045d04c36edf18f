"""Lightning modules and their training utilities. Submodules are imported where used (``idrecog.lit.unified``),
so that importing this package stays cheap."""
