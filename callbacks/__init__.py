"""Lightning callbacks: EMA teacher, prototype momentum, CAM logging. All correct under DDP."""
