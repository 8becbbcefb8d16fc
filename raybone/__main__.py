from raybone.cli import main

main()
