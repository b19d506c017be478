"""Reading inputs: files and lake tables into rows with stable ids."""
