from occbench.cli import main

main()
