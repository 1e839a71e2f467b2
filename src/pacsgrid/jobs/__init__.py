"""Background and batch jobs: resumable, progress in view, one owner per work item."""
