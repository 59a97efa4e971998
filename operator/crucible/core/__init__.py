"""Pure logic shared by both backends: plan, failure classification, decide, status."""
