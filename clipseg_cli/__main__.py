from clipseg_cli.commands.app import main

main()
