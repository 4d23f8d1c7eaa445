"""menagerie.train."""
