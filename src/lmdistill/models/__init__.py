"""Models: loading teachers and students, cutting a student from a teacher, GGUF files."""
