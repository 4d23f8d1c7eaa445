"""menagerie.export."""
