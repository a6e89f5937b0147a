"""What a page shows, computed from API answers: plain functions, no HTTP, no templates."""
