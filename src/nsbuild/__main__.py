from nsbuild.cli.main import entry

entry()
