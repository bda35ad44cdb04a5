"""simimg's web app: `streamlit run app.py`.

Search is the landing page; Browse, Review, Train, Build and Inspect sit beside it.
"""


def main() -> None:
    # imported here, not above: a job's child runs this file too (see the end), and needs none of it
    import streamlit as st

    import simimg
    from simimg.app import shared

    simimg.reuse_freed_memory()  # process-wide allocator tuning: the entry point opts in (once per process)
    st.set_page_config(page_title="simimg", page_icon="🔎", layout="wide")
    if not shared.access_gate():  # a login, or a refusal to serve other machines without one
        st.stop()
    navigation = st.navigation(
        [
            st.Page("app_pages/search.py", title="Search", icon=":material/image_search:", default=True),
            st.Page("app_pages/browse.py", title="Browse", icon=":material/photo_library:"),
            st.Page("app_pages/review.py", title="Review", icon=":material/rule:"),
            st.Page("app_pages/train.py", title="Train", icon=":material/model_training:"),
            st.Page("app_pages/build.py", title="Build", icon=":material/library_add:"),
            st.Page("app_pages/inspect.py", title="Inspect", icon=":material/insights:"),
        ]
    )
    shared.style()
    shared.sidebar()
    navigation.run()


# Streamlit runs this file as `__main__`; a background job's child (app/background.py) runs its parent's
# `__main__` again as `__mp_main__` before its task, and must not run the app and its Search page there.
if __name__ == "__main__":
    main()
