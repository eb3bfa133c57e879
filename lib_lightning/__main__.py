from lib_lightning.cli import main

main()
