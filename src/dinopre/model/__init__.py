"""The networks and their maths: ViT backbone, heads, losses, the student-teacher method, optimizer, schedules."""
